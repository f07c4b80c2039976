"""diktyo.proxy"""
