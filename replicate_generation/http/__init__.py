"""The parts of the HTTP layer that the JSON routes (app.py), the operator routes (ops.py) and the
console (web/) share: auth, strict request reading, the one error shape and the response bodies."""
