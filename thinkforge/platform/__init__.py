"""thinkforge.platform"""
