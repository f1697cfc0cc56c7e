"""Tables, figures and the HTML report."""

from nclayers.report.table import Table

__all__ = ["Table"]
