"""Celery glue: ``celery -A tasks worker`` and ``celery -A tasks flower`` load ``app`` from here."""

from tasks.app import create_app

app = create_app()

__all__ = ["app"]
