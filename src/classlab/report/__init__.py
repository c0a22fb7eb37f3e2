"""Tables, claims and figures from saved metrics and predictions."""
