"""diktyo.dashboard: the web UI served by the control plane."""
