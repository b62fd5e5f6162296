"""Showing results: terminal tables, the HTML report, the monitor's view."""
