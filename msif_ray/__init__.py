"""msif-ray: multi-stage influence functions with EK-FAC curvature, on Ray."""
