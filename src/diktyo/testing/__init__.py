"""diktyo.testing"""
