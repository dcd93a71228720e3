"""Self-healing: from failing probes and user feedback to a validated, staged, released patch.

    probes + feedback → triage (K users or a trusted source; re-checked on the deployed model;
    protected facts and probes refused) → subject (given, or found by corruption) → one patch
    (the method table) → gates → shadow, canary steps → promote | abort | pause

`rankone heal` runs it (`rankone.heal.loop.Healer`). Heal reads a running server over HTTP and
the registry through the library; it never imports `serve`. Every decision is an audit entry
holding the evidence it was taken on.
"""
