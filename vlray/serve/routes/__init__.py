"""The service's routers: ``/api/search/*``, ``/api/{info,item,masks,thumbnail}``, operations."""
