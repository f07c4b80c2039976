"""diktyo.telemetry"""
