"""The server side of the trust boundary: the round loop and what an algorithm sees.

Nothing here imports the client side (:mod:`fedmmkt_core.client`) nor holds a client's training
data: algorithms reach clients only through :meth:`ServerContext.exchange`, whose messages the
backend carries. ``import-linter`` checks the separation (``pyproject.toml``).

* :mod:`~fedmmkt_core.server.context`: :class:`ServerContext`, what an algorithm sees during a run;
* :mod:`~fedmmkt_core.server.runner`: :class:`Runner`, a run from a validated recipe to its folder;
* :mod:`~fedmmkt_core.server.summary`: the run's ``summary.json``.
"""
