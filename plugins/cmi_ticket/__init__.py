"""The ``cmi-ticket`` standard: the airline ticket of the CMI seed deck."""
