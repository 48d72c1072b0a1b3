"""Small dependency-free helpers (raster canvas, PNG plots) shared across the framework."""
