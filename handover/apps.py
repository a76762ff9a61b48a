from django.apps import AppConfig


class HandoverConfig(AppConfig):
    name = "handover"
    verbose_name = "Handover"
    default_auto_field = "django.db.models.BigAutoField"
