"""Seeing what ran: ``top`` follows live agents, ``report_data`` and ``report_render`` turn telemetry and task
records into a report."""
