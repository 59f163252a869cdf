"""AWS console links of amibake's resources (operator extra links)."""
