"""thinkforge.serve"""
