"""What the service knows of models: no Flask, no Replicate calls but one (a schema fetch).

Imports point down this list: catalogue, validation, schemas, schema_fetch (the one I/O), chains,
cost, fallback, routing, placeholder.
"""
