"""Transparent capture: the 15001 / 15006 listeners, original destination, protocol sniffing."""
