"""Reading scans and writing masks in the scan's own geometry."""
