"""The demo: a CRM-like source database, a reporting target, and a live change generator."""
