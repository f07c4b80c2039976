"""diktyo.core"""
