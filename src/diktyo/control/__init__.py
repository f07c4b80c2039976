"""diktyo.control"""
