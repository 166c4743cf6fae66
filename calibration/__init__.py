"""Node calibration: the versioned reference prompt set, image scorers, and Celery tasks that measure each
expert against its base and write CAPABILITY edges."""
