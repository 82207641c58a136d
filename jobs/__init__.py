"""Drivers and the command-line interface."""
