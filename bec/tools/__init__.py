"""Tools, not runtime: the page generator (``synth``), the ldv1 training script and the
evaluations on generated and real pages. No worker process imports this package (a test
holds that), so a worker host needs neither HarfBuzz, FreeType nor the fonts."""
