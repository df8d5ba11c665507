"""The XSDs of the CMI core vocabulary, shipped as package data."""
