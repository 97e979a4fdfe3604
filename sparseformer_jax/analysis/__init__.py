"""Analysis tools: token intermediates (RoIs, sampling points), pictures, profiles."""
