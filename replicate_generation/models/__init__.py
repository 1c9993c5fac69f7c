"""What the service knows of models: no Flask, no Replicate calls but one (a schema fetch).

Imports point down this list: catalogue (the curated nine, data), validation (inputs against
the catalogue), schemas (policy and cog schemas of other models), schema_fetch (the one I/O:
fetch and cache a schema), chains, cost, fallback (mapping an input to another model), routing
(reference routing and the plan of one item), placeholder (the black image).
"""
