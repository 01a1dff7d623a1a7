"""The model room: loading, tokenising, pooling and forward passes (torch and
transformers live here and nowhere else), and the scheduler that runs the passes.

It imports only the light room (serve_app.core); the Ray shell imports it inside the
model replica's constructor, never at module level.
"""
