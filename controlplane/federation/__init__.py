"""Federation: trust bundles exchanged with other trust domains over SPIFFE bundle endpoints.

- :mod:`~controlplane.federation.relationship`: the values (a relationship with another trust
  domain, its profile, the state of its bundle) and their rules. Pure.
- :mod:`~controlplane.federation.schedule`: when to fetch a bundle next (refresh hint, bounds,
  backoff). Pure.
- :mod:`~controlplane.federation.endpoint`: this trust domain's bundle endpoint (HTTPS, GET /).
- :mod:`~controlplane.federation.client`: fetching a foreign bundle, authenticated per profile.
- :mod:`~controlplane.federation.poller`: fetching every relationship's bundle in time and storing it.
"""
