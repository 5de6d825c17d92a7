"""Tables (and later figures and the HTML report) from finished runs."""
