"""Diagnostics: one small file per diagnostic, each a `actgrad.diagnostic.Diagnostic`."""
