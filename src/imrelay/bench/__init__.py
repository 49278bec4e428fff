"""The engine behind ``imrelay bench``: load the gateway over real sockets and measure it.

* :mod:`~imrelay.bench.load`: what is sent (message kinds, their mix, numbered texts);
* :mod:`~imrelay.bench.stats`: the figures, from what was sent and what came back;
* :mod:`~imrelay.bench.procs`: the processes (simulators, the bot under test) and their
  ``/proc`` figures;
* :mod:`~imrelay.bench.driver`: the open-loop sender and the reply collector;
* :mod:`~imrelay.bench.runner`: one run at a fixed rate, or the search for the highest
  sustainable rate;
* :mod:`~imrelay.bench.report`: the tables and the JSON document.

Nothing here is imported by ``imrelay --help``; ``imrelay.cli.bench`` imports it when the
command runs.
"""

from __future__ import annotations

__all__: list[str] = []
