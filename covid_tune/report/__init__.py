"""Results -> REPORT.md, results.csv/json and figures; ``covid-tune report`` rebuilds them."""
