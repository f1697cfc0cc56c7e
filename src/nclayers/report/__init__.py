"""Tables, figures and the HTML report."""

from nclayers.table import Table

__all__ = ["Table"]
