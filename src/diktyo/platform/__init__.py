"""diktyo.platform"""
