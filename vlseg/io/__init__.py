"""Scans in (a registered table of formats: ``readers``) and masks out, in the scan's own geometry."""
