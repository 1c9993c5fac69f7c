"""Root entry: `gunicorn 'app:create_app()'` from a checkout, and `python app.py` serves."""

from replicate_generation.app import create_app
from replicate_generation.launch import serve

__all__ = ["create_app"]

if __name__ == "__main__":
    raise SystemExit(serve())
