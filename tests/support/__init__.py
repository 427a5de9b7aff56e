"""The suite's helpers, in one place (test modules import them as ``tests.support.x``).

- ``paths``: where the repository, tests/data and ../shared/corpus are.
- ``upstream``: the recording upstream SMTP server (fixtures ``upstream``, ``tls_pair``;
  registered through ``pytest_plugins`` in tests/conftest.py).
- ``relaykit``: the relay under test, in-process (``running_relay``) or as a real
  ``trackrelay relay`` process (``RelayProcess``), and SMTP clients for it.
- ``receiverkit``: the receiver in a real uvicorn thread, database outages, polling.
- ``dashboardkit``: a seeded database and the dashboard's login/CSRF helpers.
- ``seedrows``: message and event rows for read-model tests.
- ``webhook_server``: a real HTTP server that records webhook deliveries.
- ``injection_checks``: the invariants of injection (nothing but hrefs and the pixel).
- ``tracing``: peak allocation of a call (tracemalloc).
"""
