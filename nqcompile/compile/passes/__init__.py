"""FX passes of the ``nexusquant`` backend over Dynamo-captured graphs."""
