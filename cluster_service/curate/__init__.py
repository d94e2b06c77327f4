"""What people do with a fitted run's clusters: near-duplicates, outliers, balanced samples, export."""
