{{/* Names, labels and the addresses the components use to find each other. */}}

{{- define "thinkforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thinkforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thinkforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "thinkforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "thinkforge.labels" -}}
helm.sh/chart: {{ include "thinkforge.chart" . }}
{{ include "thinkforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "thinkforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "thinkforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* The RayCluster's name; KubeRay names its head Service "<name>-head-svc". */}}
{{- define "thinkforge.rayClusterName" -}}
{{- printf "%s-ray" (include "thinkforge.fullname" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* THINKFORGE_RAY_ADDRESS: the Ray job API (dashboard) of the cluster. */}}
{{- define "thinkforge.rayAddress" -}}
{{- if .Values.ray.enabled -}}
{{- printf "http://%s-head-svc:%d" (include "thinkforge.rayClusterName" .) (int .Values.ray.dashboardPort) -}}
{{- else -}}
{{- required "ray.externalAddress is required when ray.enabled is false" .Values.ray.externalAddress -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.mlflowName" -}}
{{- printf "%s-mlflow" (include "thinkforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* THINKFORGE_MLFLOW_TRACKING_URI and the Ray pods' MLFLOW_TRACKING_URI. */}}
{{- define "thinkforge.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s:%d" (include "thinkforge.mlflowName" .) (int .Values.mlflow.port) -}}
{{- else -}}
{{- required "mlflow.externalTrackingUri is required when mlflow.enabled is false" .Values.mlflow.externalTrackingUri -}}
{{- end -}}
{{- end -}}

{{- define "thinkforge.storagePath" -}}
{{- default (printf "%s/checkpoints" .Values.sharedStorage.mountPath) .Values.storagePath -}}
{{- end -}}

{{/* Pod labels that mark the control plane: the only pods allowed to reach Ray's APIs. */}}
{{- define "thinkforge.controlPlaneSelectorLabels" -}}
{{ include "thinkforge.selectorLabels" . }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{/* Environment shared by every Ray container (head and workers). */}}
{{- define "thinkforge.rayEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "thinkforge.mlflowTrackingUri" . | quote }}
- name: HF_HOME
  value: {{ printf "%s/hf-cache" .Values.sharedStorage.mountPath | quote }}
{{- end -}}


{{- define "thinkforge.redisName" -}}
{{- printf "%s-redis" (include "thinkforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* THINKFORGE_REDIS_URL: the chart's Redis, an external one, or empty (counted per replica). */}}
{{- define "thinkforge.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:%d/0" (include "thinkforge.redisName" .) (int .Values.redis.port) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}
