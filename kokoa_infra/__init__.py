"""Kokoa Proxy: origins hidden behind disposable WireGuard-tunnelled edges."""
