"""Queue-fed pipeline stages: Generate -> Forward -> Advantage -> Train."""
