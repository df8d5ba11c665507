"""The ``cmi`` standard: the CMI core vocabulary (transaction, request, offer, acceptance)."""
