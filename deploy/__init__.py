"""Running the platform: the Celery app, queues and beat schedules, the generation task, the
``diffgraph`` CLI, and the production stack (compose file, Neo4j Browser files)."""
