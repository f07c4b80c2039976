"""diktyo.cli"""
