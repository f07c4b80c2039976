"""diktyo.control.serve: debounce, snapshot cache, push and ACK/NACK bookkeeping."""
