"""diktyo.api"""
