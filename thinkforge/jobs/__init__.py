"""thinkforge.jobs"""
