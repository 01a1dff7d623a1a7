"""The Ray shell: the two Serve deployments, the handle calls between them (transport),
the app builder, the `python -m serve_app` launcher and its pre-flight checks, the
warm-start zygote, metrics and resource sizing.

It imports the light room and the HTTP room at module level, and the model room only
inside the model replica (so the ingress never loads torch).
"""
