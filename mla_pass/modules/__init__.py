"""The modules a rewritten graph calls: ``LatentAttention`` (the converted site), its saved
``SitePlan``, and ``KVCacheAttention`` (the unconverted baseline with the usual K/V cache)."""
